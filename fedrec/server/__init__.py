"""The server side of the wire: the ServerApp, the run builder, rounds and metering,
strategies, central DP and SecAgg+'s server half."""
