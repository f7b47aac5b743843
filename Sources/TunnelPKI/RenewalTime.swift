import Foundation
import X509

extension Certificate {
    /// When the holder asks for a new certificate: two thirds into this one's life, so a third of it is left
    /// for retries (the same rule for the server's serving certificate and a node's certificate).
    public var renewalTime: Date {
        let life = notValidAfter.timeIntervalSince(notValidBefore)
        return notValidBefore.addingTimeInterval(life * 2 / 3)
    }
}
