"""Token-reduction methods: the interface (base), where they come from (registry), one operating
point (point), the built-ins one file each (builtin/), and the algorithms they share (merging, cts)."""
