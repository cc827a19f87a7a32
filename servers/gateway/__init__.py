"""The gateway: its request handling and the store behind it."""
