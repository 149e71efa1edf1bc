"""Router mode: several models behind one address, one child process each (docs/router.md)."""
