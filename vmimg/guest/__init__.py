"""Stage 3, what runs in the guest: the init agent (injection and console protocol), the kernel."""
