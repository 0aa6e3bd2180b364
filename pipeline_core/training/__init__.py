"""Tooling, never imported by the runtime: the trainer, the synthetic shapes world, the toy model's recipe and
its evaluation. ``python -m ip2p_nodes.pipeline_core.training`` is the trainer's command line."""
