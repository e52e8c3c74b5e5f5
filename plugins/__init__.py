"""halephant's default policies, one per module, each an ordinary plugin registered through the
`halephant` entry-point group exactly as a third-party package registers its own.

Disable any of them with `plugins: {disable: [name]}` in halephant.yaml (another plugin must then
answer that hook, or halephant refuses to start)."""
