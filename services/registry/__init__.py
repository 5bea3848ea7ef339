"""Registry service: model versions, aliases, traffic policy, rollback and the Watch stream."""
