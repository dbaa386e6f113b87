"""The address DHT: signed "virtual IP -> node" records kept at the nodes closest to hash(room, IP).

Pure core (records.py, store.py) fed `now` in wall-clock seconds, since records cross machines; the node
driver routes PUT/GET/VALUE messages through the overlay.
"""
