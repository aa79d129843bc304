"""The server's decisions as pure values: state tables, round rules, the round core.

Nothing here touches a socket, a file, a clock or the database: callers pass ``now`` and
what is on record, and get back what to do. ``fl_server.runner`` carries that out.
"""
