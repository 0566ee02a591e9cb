"""The TUI's widgets: each one job (the packet list, the detail tree, the hex pane, the filter bar,
the status bar)."""
