"""Deprecated path of the toy model's evaluation, kept so documented commands and scripts keep working.

Use ``python -m ip2p_nodes.pipeline_core.training.evaluation``; this name goes away in a later minor release.
"""

import logging
import sys

if __name__ == "__main__":
    from .training.evaluation import main

    logging.getLogger(__name__).warning(
        "ip2p: 'python -m ip2p_nodes.pipeline_core.evaluation' moved to '... pipeline_core.training.evaluation'"
    )
    sys.exit(main())
