"""What the server runs with: llama-server's command line in flag groups (cli, cli_chat,
cli_engines, cli_drain) and the `Settings` built from it (settings)."""
