"""The subcommands of the `opdcore` command (opdcore.cli), one module each with `main(argv) -> exit code`."""
