"""Property-based differential tests of async vs sync scheduling (hypothesis strategies, runner).

Not built yet: the async-equivalence tests in ``tests/test_async_equivalence.py`` cover the fixed
scenarios for now. The package exists so that the layout matches the design.
"""
