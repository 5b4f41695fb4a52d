"""`python -m ferrum_jax.bench ...`: the same as `ferrum-jax bench ...` (see ferrum_jax.bench.cli)."""

import sys

from ferrum_jax.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
