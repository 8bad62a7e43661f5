"""Hardware-agnostic engine core: requests, KV blocks, scheduler, batch metadata, sampler."""
