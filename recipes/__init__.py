"""Runnable experiments, installed as ``advtrain.recipes``; each is an ``advtrain`` subcommand."""
