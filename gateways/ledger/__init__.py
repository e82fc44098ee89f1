"""The IoT-to-ledger gateway: QKD-encrypted, signed IoT records anchored on Ethereum."""
