"""visinstruct tests: a regular package, so that no installed top-level `tests` package (latex2sympy2, an lmms-eval dependency, ships one) shadows it."""
