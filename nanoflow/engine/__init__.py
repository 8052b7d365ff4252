"""The serving engine: requests, paged KV cache, dense-batch scheduler, runner, step loop."""
