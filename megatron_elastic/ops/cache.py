"""The one cache-sized block the CPU paths of ``ops`` work in."""

# 1 MiB of float32: a core's L2 on the 2-core EPYC the CPU paths were measured on. An elementwise step over a
# block this size reads and writes in cache; over a whole large tensor it streams through memory (measured there:
# 4-7x slower per element once a step's operands pass the L3 share a VM sees).
CPU_BLOCK_ELEMENTS = 1 << 18
