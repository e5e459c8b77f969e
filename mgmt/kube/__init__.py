"""The Kubernetes config source of the management plane (`ambit mgmt --source kube`): docs/kube.md."""
