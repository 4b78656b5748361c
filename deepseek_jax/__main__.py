from deepseek_jax.cli import main

raise SystemExit(main())
