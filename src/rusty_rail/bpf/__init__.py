"""BPF programs (C sources compiled next to themselves by `make bpf`) and the ctypes libbpf binding."""
