import Foundation
import NIOCore
import TunnelPKI
import TunnelWire
import X509

/// Renewing the node certificate over the tunnel before it expires.
extension EdgeTunnelAgent {
    /// Asks for a new certificate over the tunnel once two thirds of the current one's life have passed;
    /// while an answer is outstanding (or the server refused), asks again no sooner than 30 s later.
    func scheduleRenewal(_ tunnel: AgentTunnel, notBefore minimum: Double = 0) {
        guard let credentials = lock.withLock({ credentials }) else { return }
        // Re-check at least hourly: a long sleep would not survive a suspended machine's clock jump.
        let delay = min(max(minimum, credentials.renewalTime.timeIntervalSinceNow, 0.5), 3600)
        tunnel.channel?.eventLoop.scheduleTask(in: .milliseconds(Int64(delay * 1000))) { [weak self, weak tunnel] in
            guard let self, let tunnel, tunnel.channel?.isActive == true else { return }
            guard let current = self.lock.withLock({ self.credentials }), Date() >= current.renewalTime else {
                self.scheduleRenewal(tunnel)
                return
            }
            self.requestRenewal(tunnel)
            self.scheduleRenewal(tunnel, notBefore: 30)
        }
    }

    private func requestRenewal(_ tunnel: AgentTunnel) {
        do {
            let (csrPEM, key) = try AgentCredentials.makeCSR(nodeName: configuration.nodeName)
            tunnel.pendingRenewalKey = key
            tunnel.mux.sendControl(RenewRequest(csrPEM: csrPEM))
            logger.info("requesting a renewed node certificate")
        } catch {
            logger.warning("cannot make a renewal request: \(error)")
        }
    }

    func renewed(_ ok: RenewOK, key: Certificate.PrivateKey) {
        do {
            guard let old = lock.withLock({ credentials }) else { return }
            let certificate = try Certificate(pemEncoded: ok.certificatePEM)
            guard certificate.publicKey == key.publicKey,
                old.ca.publicKey.isValidSignature(certificate.signature, for: certificate)
            else {
                logger.warning("server returned a renewed certificate that does not match our request")
                return
            }
            let renewed = AgentCredentials(certificate: certificate, privateKey: key, ca: old.ca)
            try renewed.write(to: configuration.paths)
            setCredentials(renewed)
            logger.info(
                "node certificate renewed",
                metadata: [
                    "notAfter": "\(Timestamps.iso8601(certificate.notValidAfter))"
                ])
        } catch {
            logger.warning("cannot store the renewed certificate: \(error)")
        }
    }
}
