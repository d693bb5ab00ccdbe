"""The comparison suite of outmetric against optax and optimistix (`python -m benchmarks.run`).

On CPU, jaxlib's dense factorizations (Cholesky, QR, SVD, eigh) call scipy's OpenBLAS, whose
own thread pool competes with XLA's: on a small machine a 129×129 Cholesky then takes ~50 ms
instead of ~0.1 ms. The suite runs OpenBLAS single-threaded (unless the variable is already
set), which helps every method that factorizes a matrix; the setting is recorded with the
results. It must be set before numpy is first imported, hence here.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
