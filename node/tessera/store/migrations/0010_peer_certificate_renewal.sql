-- Peer certificates are renewed through the issuing node (AdminService.RenewPeerCertificate).
-- (Run through str.format: literal braces are doubled.)
-- The serial before the current one may still renew once: a peer whose renewal answer was
-- lost retries with the certificate it still holds.
ALTER TABLE peers
    ADD COLUMN previous_certificate_serial text NOT NULL DEFAULT '',
    ADD COLUMN certificate_not_after       timestamptz;
