"""In-kernel protection: BPF programs (dbguard/bpf/) loaded with BCC. See dbguard.kernel.bpf."""
