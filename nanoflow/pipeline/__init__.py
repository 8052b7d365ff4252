"""NanoFlow's operation-level pipeline: ops of a layer, nano-batch plans, the executor."""
