"""Training entry points. `python -m train.demo` is the foundation demo until issue 5 lands."""
