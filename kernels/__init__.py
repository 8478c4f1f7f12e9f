"""Standalone ops (embedding gather/bag, fused residual-add + RMSNorm), each with an XLA
reference, a custom_vjp and Pallas/Triton implementations behind ``implementation=``.
Imports nothing from ``pmem``. The ops land with issue [K1]; see WORKSPACE.md, kernel matrix."""
