import os

# One BLAS thread per test process: the suite runs on as many processes as cores (xdist), and
# NumPy's multithreaded OpenBLAS on top of that made small LAPACK SVDs ~60x slower on 2 cores.
# Set before NumPy is first imported (this file is loaded before any test module, and the
# xdist workers inherit the environment).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
  os.environ.setdefault(_var, "1")

# Scripts under multidevice/ run in their own process (with 8 host devices); never import them here.
collect_ignore = ["multidevice"]
