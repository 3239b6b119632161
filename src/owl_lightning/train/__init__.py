"""Training with Lightning: the system, DataModules, callbacks, FSDP2 and checkpoint IO, FLOPs."""
