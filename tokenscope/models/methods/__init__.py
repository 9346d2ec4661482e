"""Token-reduction methods beside STEP: which policy, which exits, which in-network merging."""
