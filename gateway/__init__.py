"""Device ingress: MQTT, CoAP and HL7 MLLP; the device registry and device authentication."""
