"""`python -m sharding.dump`: print (and write) the sharding plan of a preset on a mesh.

The tool itself is `dsv3_jax.plan` (it needs the model, which sits above this library); this
entry keeps the documented command. `python -m sharding.dump --help` lists the flags.
"""

import sys

from dsv3_jax.plan import main

if __name__ == "__main__":
    sys.exit(0 if main() else 1)
