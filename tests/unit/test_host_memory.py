"""Which of the compiler's mappings may be dropped once the BPF programs are loaded: only
read-only, clean file pages (a RELRO section is read-only but holds relocated pointers)."""
from dbguard.host import clean_compiler_mappings

SMAPS = """\
7f0000000000-7f0000100000 r--p 00000000 08:01 1234  /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Size:               1024 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
7f0000100000-7f0000900000 r-xp 00100000 08:01 1234  /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Size:               8192 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
7f0000900000-7f0000a00000 r--p 00900000 08:01 1234  /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Size:               1024 kB
Private_Dirty:       900 kB
Anonymous:           900 kB
7f0000a00000-7f0000a10000 rw-p 00a00000 08:01 1234  /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Size:                 64 kB
Private_Dirty:        64 kB
Anonymous:            64 kB
7f0001000000-7f0001800000 r-xp 00000000 08:01 99  /usr/lib/x86_64-linux-gnu/libclang-cpp.so.14
Size:               8192 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
7f0002000000-7f0002100000 r-xp 00000000 08:01 77  /usr/lib/x86_64-linux-gnu/libc.so.6
Size:               1024 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
7f0003000000-7f0003001000 rw-p 00000000 00:00 0
Size:                  4 kB
Private_Dirty:         4 kB
"""


def test_only_clean_read_only_compiler_mappings():
    assert clean_compiler_mappings(SMAPS) == [
        (0x7f0000000000, 0x7f0000100000),      # .rodata, clean
        (0x7f0000100000, 0x7f0000900000),      # text
        (0x7f0001000000, 0x7f0001800000),      # clang's text
    ]                                          # not RELRO (dirty), not rw-, not libc


def test_nothing_to_release_without_the_compiler():
    assert clean_compiler_mappings("7f0002000000-7f0002100000 r-xp 00000000 08:01 77  /usr/lib/libc.so.6\n") == []
