"""The node side of the wire: the ClientApp, the node's task, DP-SGD and SecAgg+'s client half.
It imports the core and its own modules, never fedrec.server: a device runs what it needs."""
