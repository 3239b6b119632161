from owl_lightning.cli import main

main()
