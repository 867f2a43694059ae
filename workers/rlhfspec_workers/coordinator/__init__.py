"""The coordinator: the job's brain between pods (iteration loop, strategy broadcast,
sample reallocation), talking to the workers only through Redis (``messages``)."""
