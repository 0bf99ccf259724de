"""C++ kernels for x86-64 CPUs (`conv_impl='native'`): their sources, the build
(`build.py`) and the JAX ops that call them (`calls.py`)."""
