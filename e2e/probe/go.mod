module restic-operator.local/sandbox-probe

go 1.21
