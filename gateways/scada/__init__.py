"""SCADA gateway: a QKD-keyed layer-3 tunnel between a control centre and substations,
with an optional Modbus/TCP policy (`gateways.scada.modbus`)."""
