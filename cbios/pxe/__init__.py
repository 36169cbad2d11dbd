"""PXE: the bundle a build makes for network boots, and the server field staff run."""
