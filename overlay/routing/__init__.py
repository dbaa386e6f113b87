"""Pure routing core: ring table, neighbour selection, forwarding decision, maintenance rules.

No sockets, no clocks: the node driver and the simulator in sims/ call the same functions.
"""
