"""``fedmoe-coord simulate``: a coordinator and N device runtimes as separate processes on one machine,
talking over real websockets on loopback, on real data (the project's main demo)."""
