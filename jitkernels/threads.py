"""When a kernel is worth running on several threads.

A parallel Numba region wakes every worker thread and waits for the slowest. On a small input that
costs more than the work, and on a busy machine a worker that the OS has descheduled stalls the
region for a whole time slice (milliseconds, for microseconds of work). So elementwise kernels run
on the calling thread below `PARALLEL_MIN_ELEMENTS` elements, which is every decode step (T = 1).
The matrix-vector products stay parallel at any size: they are bound by memory bandwidth, which
one core cannot use up.
"""

PARALLEL_MIN_ELEMENTS = 1 << 16  # ~64 rows of 1024: tens of microseconds of elementwise work
