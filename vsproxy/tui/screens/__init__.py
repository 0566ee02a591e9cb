"""The TUI's screens: packets, connections, devices, follow stream, help, save."""
