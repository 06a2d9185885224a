"""In-kernel protection: BPF programs (bpf/) loaded with BCC. See dbguard.kernel.bpf."""
