"""Scale-out on existing engines: per-item work on a process pool or Ray, training under DDP (accelerate)."""
