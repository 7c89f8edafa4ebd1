from alexnet_mlflow.cli import main

main()
