"""gateway_plugin package."""
