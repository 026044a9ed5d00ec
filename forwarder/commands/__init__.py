"""The operator commands of ``forwarder``: one module per command, sharing `common`."""
