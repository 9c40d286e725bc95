"""sync_guard: host-sync detector, pinned-buffer race checker and the ``nosync`` pytest plugin.

Not built yet: see the sync_guard issue. The package exists so that the layout matches the design.
"""
